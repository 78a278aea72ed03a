"""proxykit's own HTTP routes: liveness, readiness, the model list and metrics (`public`); the
management API will live beside it."""

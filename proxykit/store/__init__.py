"""The usage store: one row per finished LLM request, hourly totals, budgets' spend (CONTRACT section 8)."""

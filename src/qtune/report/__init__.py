"""Tables and plots of results."""
from .tables import ResultRow, benchmark_table, write_results

__all__ = ["ResultRow", "benchmark_table", "write_results"]

"""Reports: the local Markdown/HTML report with charts, and the W&B sink and report.

``write_report`` and ``format_table`` are what the CLI calls; the W&B modules import
wandb lazily so that ``import divebench.report`` never needs it.
"""

from divebench.report.markdown import format_table, write_report

__all__ = ["format_table", "write_report"]

"""`python -m runtime.cli.grafana_files [DIR]`: write Grafana's provisioning and the four
dashboards (runtime/integrations/grafana/) under DIR (default `monitoring/`); a test fails while
the committed files are stale."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from runtime.integrations.grafana.dashboards import build_dashboards
from runtime.integrations.grafana.provisioning import write_monitoring_files


def main(argv: Sequence[str] = ()) -> int:
    monitoring = Path(argv[0]) if argv else Path("monitoring")
    for path in write_monitoring_files(monitoring, build_dashboards()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

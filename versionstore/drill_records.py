"""Plain records of restore drills and alerts, shared by the metadata store and the domain."""

from dataclasses import dataclass
from typing import Any

#: What a drill's scratch environment is named with: `<cloud>.drill-<job id>`. No product
#: environment can have a '.' in its name (ids.check_cloud_name), so a scratch name never
#: collides with one, and the job id makes it unique among drills.
SCRATCH_MARK = ".drill-"


@dataclass(frozen=True)
class DrillScheduleRow:
    cloud: str
    schedule: dict[str, Any]  # every, at, weekday (retention.parse_schedule)
    sample: dict[str, Any]  # sample_size or sample_fraction
    next_run_at: float
    last_run_at: float | None


@dataclass(frozen=True)
class AlertState:
    """The last outcome of one watched operation (snapshot, retention, drill) of an environment."""

    cloud: str
    operation: str
    failing: bool
    failures: int
    last_error: str | None
    last_failure_at: float | None
    last_success_at: float | None

"""A cohort trial's members (issue 27), each tracked as a child run of its own: `MemberRuns`, mixed into
child_runs.TrackingCallback.

A cohort trial trains K configurations as one fused model, but users compare configurations, so each member
gets the run an ordinary trial would (its own params, per-epoch metrics, tags, files and stop_reason) and the
cohort trial gets none. Its reports carry training.cohort.MEMBERS_KEY: {member id: that member's report}; a
member's non-empty `stop_reason` marks its last epoch, and its run ends there. Members still training when the
cohort trial ends get the trial's reason. Every write goes through the outage queue keyed by the member id.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

from mlflow.entities import Run, RunStatus

from gan_tune.tracking.trial_files import member_files, member_folder
from gan_tune.training.cohort import MEMBERS_KEY, member_configs, member_id


class MemberRuns:
    """The member side of TrackingCallback; it uses the callback's start_run, log_report, end_run and upload."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, dict]] = {}  # cohort trial id -> {member id: the member's config}
        self.open_members: set[str] = set()
        self.member_outcomes: dict[str, str] = {}  # member id -> stop reason
        self.ended_members: set[str] = set()  # members whose run an earlier session of a resumed search FINISHED

    def note_ended_member(self, run: Run) -> None:
        """setup(): a member run that ended on its own (its stop_reason, not the search's end or an error) is
        not reopened when its cohort trial resumes."""
        if "cohort_trial_id" in run.data.tags and run.info.status == "FINISHED":
            self.ended_members.add(run.data.tags["trial_id"])

    def start_members(self, trial: Any) -> None:
        configs = member_configs(trial.config)
        self.members[trial.trial_id] = {member_id(trial.trial_id, k): config for k, config in enumerate(configs)}
        for member in self.members[trial.trial_id]:
            if member not in self.ended_members:
                self.open_member(trial, member)

    def open_member(self, trial: Any, member: str) -> None:
        self.open_members.add(member)
        self.start_run(member, member, self.members[trial.trial_id][member], trial.path,
                       cohort_trial_id=trial.trial_id)

    def log_member_reports(self, trial: Any, result: dict) -> None:
        """Each member's report on its own run; a member whose report has a stop_reason ends there.

        Tune (2.60) hands callbacks the nested result, so MEMBERS_KEY holds a dict (its schedulers and searchers
        get a flattened copy)."""
        configs = self.members[trial.trial_id]
        for member, report in result[MEMBERS_KEY].items():
            if member not in configs:
                self.warn(f"trial {trial} reported member {member}, which its config does not have")
                continue
            if member not in self.open_members:  # trained again from a checkpoint older than its end
                self.open_member(trial, member)
            self.log_report(member, configs[member], report, own=(trial.trial_id,))
            if report.get("stop_reason"):
                self.finish_member(trial, member, RunStatus.FINISHED, report["stop_reason"], "TERMINATED")

    def finish_member(self, trial: Any, member: str, status: int, reason: str, tune_status: str,
                      error: str = "") -> None:
        """End one member's run: its stop_reason, the files in its own folder; the cohort trial's overhead so far."""
        if member not in self.open_members:
            return
        self.member_outcomes[member] = reason
        try:
            self.end_run(member, functools.partial(member_files, trial, member), status, reason, tune_status,
                         error, self.overhead_s[trial.trial_id])
        finally:
            self.open_members.discard(member)

    def finish_members(self, trial: Any, status: int, reason: str, tune_status: str, error: str = "") -> None:
        """The cohort trial ended: its members still training end with its reason (none for an ordinary trial)."""
        for member in self.members.get(trial.trial_id, ()):
            self.finish_member(trial, member, status, reason, tune_status, error)

    def end_cohort_at_search_end(self, trial: Any) -> None:
        """on_experiment_end: members still training end KILLED ("search ended"), and the members that ended
        earlier get the files that reached storage after them (Ray syncs a worker's folder when its actor stops)."""
        if trial.trial_id in self.open_trials:
            self.finish_members(trial, RunStatus.KILLED, "search ended", trial.status)
            self.finish_trial(trial, RunStatus.KILLED, "search ended", trial.status)
        for member in self.members[trial.trial_id]:
            if member in self.member_outcomes:
                self.upload(member, functools.partial(member_files, trial, member))

    def undelivered_member_files(self, trial: Any) -> list[dict[str, Any]]:
        """save_undelivered: one upload_files entry per ended member whose files its run does not have."""
        return [{"trial_id": member, "run_id": None, "kind": "upload_files",
                 "payload": {"folder": member_folder(trial.path, member)}}
                for member in self.members[trial.trial_id]
                if member in self.member_outcomes and self.files_to_upload(member, member_files(trial, member))]

    def configuration_outcomes(self) -> Counter:
        """How each configuration ended: an ordinary trial counts once, a cohort trial once per member."""
        counts = Counter(reason for trial_id, reason in self.outcomes.items() if trial_id not in self.members)
        counts.update(self.member_outcomes.values())
        return counts

"""Calibration per model pair: the thresholds of a trigger-based policy chosen from a dev set.

The thresholds of trigger-based collaboration depend on the pair: TrigReason tunes ``rho`` per
small model (0.85 for R1-Distill-1.5B, 0.75 for Qwen3-0.6B, Sec. 4). `calibrate` chooses them from
a dev set instead of by hand:

1. *record*: the small model answers every problem alone while every candidate signal is
   measured on each of its steps (nothing fires); the large model answers alone too, for the
   reference accuracy. Per-signal AUROC for predicting a wrong small-only answer is reported.
2. *search*: for each candidate trigger, the threshold is searched (a few full runs of the pair,
   bracketing on the measured small-model token share) so that the small model writes at least
   ``target_share`` of the reasoning tokens; among the thresholds run, the most accurate one
   that reaches the target is kept.
3. *choose*: the most accurate candidate that reaches the target (ties: higher share) becomes the
   policy, written as a JSON policy file that ``collab-agent run/eval --policy FILE.json`` and
   ``CollabChatModel`` load with `load_policy_file` (`collab_agent.policies.files`, re-exported
   here).

The small-model token share is aggregated over the data set: small-model reasoning tokens over
all reasoning tokens of accepted steps, summed over problems.

One module per job: `candidates` (what is scored, read from the trigger registry), `runs` (a
policy over the dev set, on the evaluation runner's loop), `recording` (the small-only run with
every signal measured), `replay` (the same on an eval run's traces), `auroc` (how well a signal
predicts a wrong answer), `thresholds` (the thresholds a signal offers) and `search` (the
threshold search and the choice, `calibrate`).
"""

from collab_agent.calibration.auroc import auroc, signal_quality
from collab_agent.calibration.candidates import (
    CANDIDATES,
    Candidate,
    Measure,
    candidates_by_name,
    cognitive_offload_candidate,
    signal_candidate,
)
from collab_agent.calibration.recording import (
    Recording,
    SignalRecorder,
    StepRecord,
    record_signals,
)
from collab_agent.calibration.replay import replay_signals
from collab_agent.calibration.runs import (
    Grader,
    PolicyRun,
    ProblemRun,
    default_grader,
    run_policy,
)
from collab_agent.calibration.search import CalibrationResult, CandidateResult, calibrate
from collab_agent.calibration.thresholds import threshold_for_fraction, threshold_options
from collab_agent.policies.files import (
    POLICY_FILE_FORMAT,
    POLICY_FILE_VERSION,
    load_policy_file,
    policy_from_dict,
    policy_to_dict,
    save_policy_file,
    trigger_from_dict,
    trigger_to_dict,
    trigger_types,
)

__all__ = [
    "CANDIDATES",
    "POLICY_FILE_FORMAT",
    "POLICY_FILE_VERSION",
    "CalibrationResult",
    "Candidate",
    "CandidateResult",
    "Grader",
    "Measure",
    "PolicyRun",
    "ProblemRun",
    "Recording",
    "SignalRecorder",
    "StepRecord",
    "auroc",
    "calibrate",
    "candidates_by_name",
    "cognitive_offload_candidate",
    "default_grader",
    "load_policy_file",
    "policy_from_dict",
    "policy_to_dict",
    "record_signals",
    "replay_signals",
    "run_policy",
    "save_policy_file",
    "signal_candidate",
    "signal_quality",
    "threshold_for_fraction",
    "threshold_options",
    "trigger_from_dict",
    "trigger_to_dict",
    "trigger_types",
]

"""The editing-damage lab: experiment file -> resumable run -> results store
(its report: `factedit.report`).

    from factedit.lab import load_experiment, run_experiment
    from factedit.report import write_report
    run_experiment("examples/experiment.yaml", "runs/demo")    # factedit run CONFIG --out DIR
    run_experiment(None, "runs/demo", resume=True)              # factedit run --resume DIR
    run_experiment(None, "runs/demo", resume=True, methods=["memit"])   # ... --methods memit
    write_report("runs/demo")                                   # factedit report DIR

See docs/experiments.md for the file format and the store's tables.
"""

from .config import Experiment, ExperimentError, MethodRun, load_experiment
from .runner import RunInterrupted, resume_experiment, run_experiment, unfinished_methods
from .store import ResultsStore

__all__ = [
    "Experiment", "ExperimentError", "MethodRun", "ResultsStore", "RunInterrupted",
    "load_experiment", "resume_experiment", "run_experiment", "unfinished_methods",
]


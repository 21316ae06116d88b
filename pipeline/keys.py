"""The names runs are recorded under in MLflow: written by the runner, the training
loop and the stages, read back by `pipeline report` and the scaling fits. Writers
and readers both take them from here."""

from __future__ import annotations


class Tag:
    STAGE = "stage"  # a stage's nested run: the stage's name
    STATUS = "status"  # "ran" or "cached"
    FINGERPRINT = "fingerprint"
    GIT_COMMIT = "git_commit"
    KIND = "kind"  # on the parent run: PIPELINE
    SWEEP = "sweep"
    PRODUCED_BY = "produced_by_run"  # a cached stage's run: the run that made its outputs
    PARENT = "mlflow.parentRunId"
    RUN_NAME = "mlflow.runName"
    NOTE = "mlflow.note.content"  # the description MLflow shows on a run's page


PIPELINE = "pipeline"  # Tag.KIND of a pipeline run (its stages are nested under it)
RAN, CACHED = "ran", "cached"  # Tag.STATUS values
SCALING_FIT = "scaling_fit"  # Tag.STAGE of a scaling fit's run


class Metric:
    LOSS = "loss"  # training loss, mean over a logging window and the ranks
    VAL_LOSS = "val_loss"
    VAL_ACCURACY = "val_accuracy"
    LR = "lr"
    FLOPS = "flops"  # cumulative training compute
    MFU = "mfu"
    EPOCH = "epoch"
    BATCH_DIGEST = "batch_digest"  # of the step's global batch (`pipeline batches` recomputes it)
    STAGE_SECONDS = "stage_seconds"
    PEAK_GPU_MEMORY_GB = "peak_gpu_memory_gb"  # torch's peak allocation on the rank's GPU so far
    # also: the kind's unit ("tokens" or "images") consumed, and `per_second(unit)`

    @staticmethod
    def per_second(unit: str) -> str:
        return f"{unit}_per_s"

    @staticmethod
    def final(name: str) -> str:
        """A training stage's last reported value, logged on its run at the end."""
        return f"final_{name}"


class Param:
    PARAMS_TOTAL = "params_total"
    PARAMS_NON_EMBEDDING = "params_non_embedding"
    WORLD_SIZE = "world_size"
    ZERO_STAGE = "zero_stage"
    SKIPPED_SHARDS = "skipped_shards"
    SKIPPED_VAL_SHARDS = "skipped_val_shards"


class Artifact:
    CONFIG = "config.yaml"  # the resolved run config, secrets redacted
    SKIPPED_SHARDS = "skipped_shards.txt"
    LOSS_PLOT = "loss.png"

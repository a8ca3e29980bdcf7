"""The names of carsml's MLflow run tags: an agreement between the code that writes a tag and the code that reads it.

Every tag carsml sets on a run is `carsml.<name>`; write and read them through these constants, never as literals
(search filters too: ``f"tags.`{ENTRY_POINT}` = 'transfer'"``).
"""

from __future__ import annotations

PREFIX = "carsml."

# every run (tracking.runs.start_run / log_dataset)
ENTRY_POINT = "carsml.entry_point"  # the experiment that made the run: how a run is read back (config_from_run)
VERSION = "carsml.version"
GIT_COMMIT = "carsml.git_commit"
GIT_DIRTY = "carsml.git_dirty"
DATA_ROOT = "carsml.data_root"
DATA_LAYOUT = "carsml.data_layout"
DATA_DIGEST = "carsml.data_digest"
HAS_IMAGES = "carsml.has_images"
NUM_CLASSES = "carsml.num_classes"

# training runs
MODEL = "carsml.model"  # the architecture name (baseline_cnn, resnet50, ...)
MODELS = "carsml.models"  # transfer_all: the models of its children
INIT = "carsml.init"  # transfer: where the initial weights came from
CHECKPOINT_DIR = "carsml.checkpoint_dir"  # what resume_run_id continues from
FOLD = "carsml.fold"  # a k-fold child: its held-out fold
PARENT_RUN_ID = "carsml.parent_run_id"
SELECTION_RUN_ID = "carsml.selection_run_id"  # a refit: the run whose validation chose its epochs
WORLD_SIZE = "carsml.world_size"  # processes that trained the model together (DDP under torchrun)
ERROR = "carsml.error"
CONTINUED_IN = "carsml.continued_in"  # a run `mlflow run` created for a resume: the run that continued instead

# analysis runs (errors, tta, new_category): the model they analysed
SOURCE_RUN_ID = "carsml.source_run_id"
SOURCE_MODEL_URI = "carsml.source_model_uri"
SOURCE_ENTRY_POINT = "carsml.source_entry_point"
MODE = "carsml.mode"  # new_category: scratch | warmstart
NEW_CLASS = "carsml.new_class"

# features_rf and promote
BACKBONE_RUN_ID = "carsml.backbone_run_id"
RF_HEAD_URI = "carsml.rf_head_uri"
RF_MODEL_URI = "carsml.rf_model_uri"
RF_RUN_ID = "carsml.rf_run_id"
MODEL_URI = "carsml.model_uri"
MODEL_VERSION = "carsml.model_version"
RF_MODEL_VERSION = "carsml.rf_model_version"
CHAMPION_MOVED = "carsml.champion_moved"
CHAMPION_REASON = "carsml.champion_reason"
RF_CHAMPION_MOVED = "carsml.rf_champion_moved"
RF_CHAMPION_REASON = "carsml.rf_champion_reason"

# tune
STUDY_NAME = "carsml.study_name"
TRIAL_NUMBER = "carsml.trial_number"
TRIAL_STATE = "carsml.trial_state"
PRUNED_AT_EPOCH = "carsml.pruned_at_epoch"
SAMPLER_SEED = "carsml.sampler_seed"
BEST_TRIAL_RUN_ID = "carsml.best_trial_run_id"
PARAM_IMPORTANCE = "carsml.param_importance"

# study
STEPS_REUSED = "carsml.steps_reused"  # the steps an invocation of the study reused instead of running
STUDY_STEPS = "carsml.study_steps"  # the latest invocation's `steps` (the param keeps the first invocation's)
STUDY_SET = "carsml.study_set"  # the latest invocation's `set`
NOTE = "mlflow.note.content"  # the run's description in the MLflow UI (a one-line key result)

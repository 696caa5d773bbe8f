"""The MLflow record's vocabulary, defined once: the tags the pipeline, the ablation and the
registry commands write and read, and the parent run's test metrics."""

KIND_TAG, STAGE_TAG, CACHED_TAG = "layerwise.kind", "layerwise.stage", "layerwise.cached"
PID_TAG, HOST_TAG = "layerwise.pid", "layerwise.host"
ARTIFACTS_KEY_TAG = "layerwise.artifacts_key"  # the content key of a stage's artifacts
ARTIFACTS_FROM_TAG = "layerwise.artifacts_from"  # identical artifacts kept by an earlier run
ARM_TAG = "layerwise.arm"  # a fine-tuning arm's run: pretrained | random
#: Stage runs that trained as one population, so each holds the wall time they shared.
TRAINED_TOGETHER_TAG = "layerwise.trained_together"
RESUMED_TAG = "layerwise.resumed_from_epoch"  # epochs a resumed stage's checkpoint held
FORMAT_TAG = "layerwise.model_format"
NOT_REGISTERED_TAG = "layerwise.not_registered"  # why a run's model was not registered
CELL_TAG, STATUS_TAG, ERROR_TAG = "layerwise.cell", "layerwise.status", "layerwise.error"
#: An ablation's pretraining layer run: the layer (1-based) and its key in the plan
LAYER_TAG, LAYER_KEY_TAG = "layerwise.layer", "layerwise.layer_key"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the description field of runs and experiments in the UI
KINDS = ("pipeline", "ablation")
#: The parent run's test metrics (``test/error_diff`` = pretrained - random).
TEST_ERROR_PRETRAINED, TEST_ERROR_RANDOM = "test/error_pretrained", "test/error_random"
TEST_ERROR_DIFF = "test/error_diff"
#: The pretrained arm's best validation error: what ``layerwise promote`` selects on.
VAL_ERROR_PRETRAINED = "valid/error_pretrained"
TEST_METRICS = {"test_error_pretrained": TEST_ERROR_PRETRAINED,
                "test_error_random": TEST_ERROR_RANDOM}
#: The reconstruct objective's parent metrics, one per method (pretrained | random | pca):
#: squared error per test image (pixels in [0,1]), the fine-tuning loss, k-NN accuracy.
RECON_ERROR, RECON_LOSS = "test/recon_error_{}", "test/recon_loss_{}"
KNN_ACCURACY = "test/knn_accuracy_{}"
RECON_ERROR_DIFF = "test/recon_error_diff"  # pretrained − random
#: The registered models a run joins by default: the classifier, or for the reconstruct
#: objective the autoencoder and its encoder.
CLASSIFIER_MODEL, AUTOENCODER_MODEL = "layerwise-classifier", "layerwise-autoencoder"
ENCODER_MODEL = "layerwise-encoder"

"""The generator a search logged on its parent run, read back from MLflow: its `models:/` URI, the loaded
torch.export program, its latent width from the input signature, and seeded samples from it.

`python -m gan_tune.sample` calls these; the ConfigErrors name that command's flags (--run-id, --model-uri).
"""

from __future__ import annotations

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gan_tune.tracking.parent_run import MODEL_NAME
from gan_tune.tracking.store import is_outage
from gan_tune.training.config import ConfigError, first_line


def model_uri_of_run(client: MlflowClient, run_id: str) -> str:
    """`models:/<id>` of the generator logged on the run; a ConfigError naming --run-id when it has none."""
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if is_outage(err):  # a store that failed is not a missing run; store_errors names it
            raise
        raise ConfigError("--run-id", f"{run_id}: no such run") from None
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'")
    if not models:
        raise ConfigError("--run-id", f"{run_id}: has no logged {MODEL_NAME} model (log one with a finished search; "
                                      "trial runs have none, use their parent)")
    return f"models:/{models[0].model_id}"


def load_generator(model_uri: str) -> torch.nn.Module:
    try:
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except (MlflowException, OSError) as err:
        raise ConfigError("--model-uri", f"{model_uri}: cannot load a model ({first_line(err)})") from None


def latent_size(model_uri: str) -> int:
    """The noise width, from the model's input signature (batch, latent_dim)."""
    signature = mlflow.models.get_model_info(model_uri).signature
    shape = signature.inputs.inputs[0].shape if signature is not None and signature.inputs.is_tensor_spec() else ()
    if len(shape) != 2:
        raise ConfigError("--model-uri", f"{model_uri}: no (batch, latent) input signature: not a gan_tune generator")
    return int(shape[1])


@torch.no_grad()
def sample(g: torch.nn.Module, latent_dim: int, n: int, seed: int) -> torch.Tensor:
    """n images in [-1, 1] from seeded noise."""
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    return g(z).float()

"""The private Lightning API that `qthink.training.lightning_private` isolates is still there, called where qthink
expects and with the parameters it uses: a Lightning upgrade that removes or renames a piece fails here, naming it."""

import inspect

import lightning as L
import pytest
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.cli import LightningCLI

from qthink.training import lightning_private


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize(("method", "params"), [("_parse_ckpt_path", ["self"]),
                                                ("_run_subcommand", ["self", "subcommand"])])
def test_the_lightning_cli_methods_qthink_overrides_exist_and_are_called(method, params):
    found = getattr(LightningCLI, method, None)
    assert found is not None, f"LightningCLI.{method} is gone: update qthink/training/lightning_private.py"
    assert parameters(found) == params, f"LightningCLI.{method} now takes {parameters(found)}, not {params}"
    assert f"self.{method}(" in inspect.getsource(LightningCLI.__init__), \
        f"LightningCLI.__init__ no longer calls {method}: qthink's override would be skipped silently"
    assert getattr(lightning_private.CLIHooks, method) is not found  # overridden in the adapter


def test_the_trainer_keeps_use_distributed_sampler_in_its_accelerator_connector():
    for value in (True, False):
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, use_distributed_sampler=value)
        assert hasattr(trainer, "_accelerator_connector"), "Trainer._accelerator_connector is gone"
        assert hasattr(trainer._accelerator_connector, "use_distributed_sampler"), \
            "Trainer._accelerator_connector.use_distributed_sampler is gone"
        assert lightning_private.uses_distributed_sampler(trainer) is value


def test_the_throughput_monitor_keeps_its_throughputs_by_stage():
    monitor = ThroughputMonitor(batch_size_fn=len)
    assert "_throughputs" in vars(monitor), "ThroughputMonitor._throughputs is gone"
    assert lightning_private.throughputs(monitor) == {}
    assert "self._throughputs[stage] = throughput" in inspect.getsource(ThroughputMonitor.setup), \
        "ThroughputMonitor.setup no longer fills _throughputs: RateMonitor would replace nothing"

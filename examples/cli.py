"""LightningCLI entry point for examples/config.yaml: model, data and both callbacks come from the config.

Needs LightningCLI's parser, jsonargparse (``pip install -e ".[cli]"``). Run::

    python examples/cli.py fit --config examples/config.yaml
    python examples/cli.py fit --config examples/config.yaml --trainer.max_epochs=1 --trainer.limit_train_batches=2
    python examples/cli.py fit --help   # every option, including the callbacks' init_args

Any model and datamodule can be named by ``class_path`` (subclass mode), e.g.
``--model.init_args.net=lightning_heavytail.models.VGG11Wide``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI
from lightning_utilities.core.imports import RequirementCache

from lightning_heavytail.known_warnings import ignore_known_warnings

# what LightningCLI itself requires (lightning/pytorch/cli.py), installed by this package's `cli` extra
JSONARGPARSE = RequirementCache("jsonargparse[signatures]>=4.27.7")


def main(argv: list[str] | None = None) -> LightningCLI:
    if not JSONARGPARSE:
        raise SystemExit(
            "examples/cli.py needs LightningCLI's parser, jsonargparse[signatures]: install this package's `cli` extra"
            f' with `pip install -e ".[cli]"` (from the repository root). ({JSONARGPARSE})'
        )
    # no model/datamodule class given: both are read from `class_path` in the config (subclass mode)
    return LightningCLI(args=argv, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    with ignore_known_warnings():  # Lightning/torch warnings no user can act on; yours still show
        main()

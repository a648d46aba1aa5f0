"""LightningCLI entry point for examples/config.yaml: model, data and both callbacks come from the config.

Run::

    python examples/cli.py fit --config examples/config.yaml
    python examples/cli.py fit --config examples/config.yaml --trainer.max_epochs=1 --trainer.limit_train_batches=2
    python examples/cli.py fit --help   # every option, including the callbacks' init_args

Any model and datamodule can be named by ``class_path`` (subclass mode), e.g.
``--model.init_args.net=lightning_heavytail.models.VGG11Wide``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


def main(argv: list[str] | None = None) -> LightningCLI:
    # no model/datamodule class given: both are read from `class_path` in the config (subclass mode)
    return LightningCLI(args=argv, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()

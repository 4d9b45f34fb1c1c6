"""``sclip`` command line: LightningCLI with fit / validate / test / predict."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from sclip_lightning.data.datamodule import SCLIPDataModule  # noqa: E402
from sclip_lightning.module import SCLIPModule  # noqa: E402


class SCLIPCLI(LightningCLI):
    """LightningCLI that feeds the model's name to the DataModule (tokenizer, preprocessing)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model_name", "data.init_args.model_name")
        parser.link_arguments("model.init_args.image_size", "data.init_args.image_size")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``sclip`` and ``python -m sclip_lightning``."""
    SCLIPCLI(
        SCLIPModule,
        SCLIPDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults={
            "plugins": [{"class_path": "sclip_lightning.checkpoint.AtomicCheckpointIO"}]
        },
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()

"""``sclip`` command line: LightningCLI with fit / validate / test / predict."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from sclip_lightning.data.datamodule import SCLIPDataModule  # noqa: E402
from sclip_lightning.module import RUNTIME_OPTIONS, SCLIPModule  # noqa: E402


class SCLIPArgumentParser(LightningArgumentParser):
    """LightningCLI's parser; an option a component does not take is reported with the
    options it does take (jsonargparse says only that it is not accepted)."""

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        return super().error(_with_accepted_options(message), ex)


def _with_accepted_options(message: str) -> str:
    import difflib
    import importlib
    import inspect
    import re

    pattern = r"Problem with given class_path '([\w.]+)':\s*\n(\s*)Option '(\w+)' is not accepted"
    for match in re.finditer(pattern, message):
        module, _, name = match[1].rpartition(".")
        if message[match.end() :].lstrip().startswith(f"{name} accepts:"):
            continue  # a parser above this one already said it
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        accepted = sorted(
            {
                p
                for c in cls.__mro__
                if "__init__" in c.__dict__ and c.__module__.startswith(("sclip_lightning", module))
                for p, kind in inspect.signature(c.__init__).parameters.items()
                if p != "self" and kind.kind not in (kind.VAR_KEYWORD, kind.VAR_POSITIONAL)
            }
        )
        close = difflib.get_close_matches(match[3], accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        line = f"{match[2]}{name} accepts: {', '.join(accepted)}{hint}"
        message = message.replace(match[0], f"{match[0]}\n{line}", 1)
    return message


class SCLIPCLI(LightningCLI):
    """LightningCLI that feeds the model's name to the DataModule (tokenizer, preprocessing)."""

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a bad setting ends with one line, not a traceback.

        jsonargparse wraps errors raised in ``__init__`` (unknown data set or model name,
        missing ``pretrained`` file, invalid option) in several layers of its own; the
        original message is the one that names the setting and the fix.
        """
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001 - re-raised unless it is a configuration error
            root = _root_cause(err)
            if isinstance(root, (ValueError, FileNotFoundError, KeyError, NotADirectoryError)):
                raise SystemExit(f"sclip: configuration error: {root}") from None
            raise

    def _run_subcommand(self, subcommand: str) -> None:
        """Data errors found while setting up (missing root or file, bad split, too few
        images for a batch, DDP ranks that disagree) end with one line when no optimiser
        step has run yet; later errors keep their traceback."""
        try:
            super()._run_subcommand(subcommand)
        except (ValueError, FileNotFoundError, NotADirectoryError) as err:
            if self.trainer.global_step > 0:
                raise
            raise SystemExit(f"sclip: configuration error: {err}") from None

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path``, Lightning re-reads the module's hyperparameters from the
        checkpoint over the given config. That is right for the model, wrong for options
        that describe this run (where results go, evaluation budgets): those keep the value
        given now (``RUNTIME_OPTIONS``)."""
        sub = self.config.get("subcommand")
        init = self.config[sub].get("model", {}).get("init_args") if sub else None
        given = {k: init.get(k) for k in RUNTIME_OPTIONS} if init is not None else {}
        super()._parse_ckpt_path()
        init = self.config[sub].get("model", {}).get("init_args") if sub else None
        if init is not None:
            for key, value in given.items():
                init[key] = value

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model_name", "data.init_args.model_name")
        parser.link_arguments("model.init_args.image_size", "data.init_args.image_size")


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a ``raise ... from`` / during-handling chain."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        nxt = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if nxt is None:
            break
        err = nxt
    return err


def build_cli(args: list[str] | None = None, run: bool = True) -> SCLIPCLI:
    """The ``sclip`` command line. ``run=False`` parses a config (no subcommand) and builds
    ``cli.model``, ``cli.datamodule`` and ``cli.trainer`` without running anything: what
    scripts use to train exactly what ``sclip fit --config ...`` would (bench/)."""
    return SCLIPCLI(
        SCLIPModule,
        SCLIPDataModule,
        parser_class=SCLIPArgumentParser,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults={
            "plugins": [{"class_path": "sclip_lightning.checkpoint.AtomicCheckpointIO"}]
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``sclip`` and ``python -m sclip_lightning``."""
    build_cli(args)


if __name__ == "__main__":
    main()

"""``sampleflow models ...``: train and evaluate the per-network models.

Plugged into the CLI by the ``sampleflow.commands`` entry point
``models = "cloud.training.commands:register"``.  Other cloud modules add
their own actions (``models push``, ``models status``) to the same group by
calling :func:`models_subparsers` from their ``register``: it returns the
``models`` sub-parsers, creating the group the first time, whichever entry
point loads first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MODELS_COMMAND = "models"


def models_subparsers(
    subparsers: argparse._SubParsersAction[Any],
) -> argparse._SubParsersAction[Any]:
    """Return the sub-parsers of the ``models`` command, creating it once."""
    parser = subparsers.choices.get(MODELS_COMMAND)
    if parser is None:
        parser = subparsers.add_parser(
            MODELS_COMMAND, help="train, evaluate and manage the detection models"
        )
        actions = parser.add_subparsers(dest="models_action", metavar="ACTION")

        def usage(_args: argparse.Namespace) -> int:
            parser.print_help()
            return 2

        parser.set_defaults(func=usage)
        return actions
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("the 'models' parser has no sub-parsers")  # pragma: no cover


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``models train``, ``models evaluate`` and ``models transfer``."""
    actions = models_subparsers(subparsers)
    train = actions.add_parser(
        "train",
        help="train, evaluate and export models on CTU-13 scenario 6",
        description="Replays CTU-13 scenario 6 as sampled flows, trains the "
        "relay and cloud auto-encoders, fits loss statistics, the detector "
        "and thresholds, evaluates on the held-out period and writes "
        "<name>.tflite, .weights.npz and .manifest.json.  Needs TensorFlow "
        "(pip install -e '.[train]').",
    )
    train.add_argument("--rate", type=int, default=100, help="1-in-N (default 100)")
    train.add_argument(
        "--window", type=int, default=300, help="window length in s (default 300)"
    )
    train.add_argument("--seed", type=int, default=6, help="base seed (default 6)")
    train.add_argument(
        "--seeds", type=int, default=4, help="thinning realisations (default 4)"
    )
    train.add_argument("--epochs", type=int, default=60, help="default 60")
    train.add_argument(
        "--kinds", default="relay,cloud", help="comma list of relay,cloud"
    )
    train.add_argument("--out", type=Path, default=None, help="default: models/")
    train.add_argument("--data", type=Path, default=None, help="CTU-13 folder")
    train.add_argument(
        "--nan-fixture",
        type=Path,
        default=None,
        help="also write a NaN-output test model (tests/data/nan-model) here",
    )
    train.set_defaults(func=run_train)

    evaluate = actions.add_parser(
        "evaluate",
        help="score models on CTU-13 or CIC-IDS2017 replayed at sampling rates",
        description="Runs each model's .tflite through LiteRT on CTU-13 "
        "(the test period, slices 20-25, or --period all) or, for a model "
        "transferred with 'models transfer', on CIC-IDS2017, sampled at each "
        "--rates with fresh thinning seeds, and prints per-run metrics with "
        "their mean and spread as JSON (or --markdown tables).  Needs no "
        "TensorFlow.  See docs/evaluation.md.",
    )
    evaluate.add_argument(
        "manifest", type=Path, nargs="+", help="<name>.manifest.json ..."
    )
    evaluate.add_argument("--rate", type=int, default=None, help="default: trained")
    evaluate.add_argument(
        "--rates",
        type=_rate_list,
        default=None,
        help="comma list of 1-in-N rates, e.g. 1,100,1000 (overrides --rate)",
    )
    evaluate.add_argument("--seed", type=int, default=1000, help="default 1000")
    evaluate.add_argument("--seeds", type=int, default=4, help="default 4")
    evaluate.add_argument(
        "--period",
        choices=("test", "all"),
        default="test",
        help="CTU-13 period: test (slices 20-25, default) or all (the whole "
        "capture; normal windows in-sample)",
    )
    evaluate.add_argument(
        "--dataset",
        choices=("ctu13", "cicids2017"),
        default=None,
        help="default: the model manifest's network (ctu13 unless transferred)",
    )
    evaluate.add_argument("--data", type=Path, default=None, help="dataset folder")
    evaluate.add_argument(
        "--json", type=Path, default=None, help="also write the metrics to this file"
    )
    evaluate.add_argument(
        "--markdown",
        action="store_true",
        help="print summary tables (mean ± std over runs) instead of JSON",
    )
    evaluate.set_defaults(func=run_evaluate)

    transfer = actions.add_parser(
        "transfer",
        help="refit a model's per-network part on CIC-IDS2017",
        description="Refits the scaler, auto-encoder and loss statistics of "
        "BASE on the benign windows of CIC-IDS2017 sampled at --rate, keeps "
        "BASE's detector and (unless --recalibrate) thresholds, and writes "
        "<kind>-cicids2017-r<N>-w<W>.{tflite,weights.npz,manifest.json} into "
        "--out.  Needs "
        "TensorFlow; evaluate the result with 'models evaluate'.",
    )
    transfer.add_argument("base", type=Path, help="base <name>.manifest.json")
    transfer.add_argument("--rate", type=int, default=100, help="default 100")
    transfer.add_argument("--seed", type=int, default=6, help="default 6")
    transfer.add_argument("--seeds", type=int, default=4, help="default 4")
    transfer.add_argument("--epochs", type=int, default=60, help="default 60")
    transfer.add_argument(
        "--out",
        type=Path,
        default=Path("build/transfer"),
        help="default build/transfer",
    )
    transfer.add_argument("--data", type=Path, default=None, help="CIC-IDS2017 folder")
    transfer.add_argument(
        "--recalibrate",
        action="store_true",
        help="also set the alert/clear thresholds from CIC validation windows "
        "at BASE's alert budget (name suffix -cal)",
    )
    transfer.set_defaults(func=run_transfer)


def _rate_list(text: str) -> list[int]:
    try:
        rates = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"rates must be comma-separated integers, got {text!r}"
        ) from exc
    if not rates or min(rates) < 1:
        raise argparse.ArgumentTypeError(f"rates must be >= 1, got {text!r}")
    return rates


def _fail(action: str, message: str) -> int:
    print(f"sampleflow models {action}: error: {message}", file=sys.stderr)
    return 1


def run_train(args: argparse.Namespace) -> int:
    """``models train``: see the parser description."""
    from cloud.training.autoencoder import (  # noqa: PLC0415 - needs TF
        TensorFlowMissingError,
        import_tensorflow,
    )
    from cloud.training.train import MODELS_DIR, TrainConfig, run_training  # noqa: PLC0415

    cfg = TrainConfig(
        rate=args.rate,
        window_s=args.window,
        seed=args.seed,
        n_seeds=args.seeds,
        epochs=args.epochs,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        out_dir=args.out or MODELS_DIR,
        dataset_dir=args.data,
    )
    try:
        import_tensorflow()  # before the minutes of loading the dataset
        paths = run_training(cfg)
        if args.nan_fixture is not None and paths:
            from cloud.training.export import write_nan_fixture  # noqa: PLC0415

            write_nan_fixture(args.nan_fixture, paths[0])
    except TensorFlowMissingError as exc:
        print(f"sampleflow models train: error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        manifest = json.loads(path.read_text())
        test = manifest["metrics"]["test"]
        print(
            f"{path}: test PR-AUC {test['pr_auc']:.3f}, ROC-AUC {test['roc_auc']:.3f}, "
            f"recall@alert {test['recall_at_alert']:.3f}, "
            f"false alerts {test['false_alert_rate_at_alert']:.4f}"
        )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``models evaluate``: see the parser description."""
    from cloud.training import cicids, ctu13  # noqa: PLC0415
    from cloud.training.evaluate import evaluate_models  # noqa: PLC0415
    from cloud.training.report import markdown_tables  # noqa: PLC0415
    from cloud.training.train import json_safe  # noqa: PLC0415
    from edge_agent.filter.model import ModelLoadError  # noqa: PLC0415

    rates: list[int | None] = list(args.rates) if args.rates else [args.rate]
    try:
        results = evaluate_models(
            args.manifest,
            rates,
            seed=args.seed,
            n_seeds=args.seeds,
            period=args.period,
            dataset=args.dataset,
            dataset_dir=args.data,
        )
    except ModelLoadError as exc:
        return _fail("evaluate", str(exc))
    except ctu13.DatasetNotFoundError as exc:
        return _fail("evaluate", f"{exc} (pass --data FOLDER or set {ctu13.ENV_DIR})")
    except cicids.DatasetNotFoundError as exc:
        return _fail("evaluate", f"{exc} (pass --data FOLDER or set {cicids.ENV_DIR})")
    payload: Any = results[0] if len(results) == 1 else results
    text = json.dumps(json_safe(payload), indent=2, allow_nan=False)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(markdown_tables(results) if args.markdown else text)
    return 0


def run_transfer(args: argparse.Namespace) -> int:
    """``models transfer``: see the parser description."""
    from cloud.training.autoencoder import (  # noqa: PLC0415 - needs TF
        TensorFlowMissingError,
        import_tensorflow,
    )
    from cloud.training.transfer import TransferConfig  # noqa: PLC0415
    from cloud.training.transfer import run_transfer as transfer  # noqa: PLC0415

    cfg = TransferConfig(
        base_manifest=args.base,
        rate=args.rate,
        seed=args.seed,
        n_seeds=args.seeds,
        epochs=args.epochs,
        out_dir=args.out,
        dataset_dir=args.data,
        recalibrate=args.recalibrate,
    )
    try:
        import_tensorflow()  # before the dataset is read
        path = transfer(cfg)
    except TensorFlowMissingError as exc:
        print(f"sampleflow models transfer: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0

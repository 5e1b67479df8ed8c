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
    """Add ``models train`` and ``models evaluate``."""
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
        help="score a shipped model on CTU-13 replayed at any sampling rate",
        description="Runs the model's .tflite through LiteRT on the test "
        "period (slices 20-25) of CTU-13 sampled at --rate with fresh seeds "
        "and prints the metrics as JSON.  Needs no TensorFlow.",
    )
    evaluate.add_argument("manifest", type=Path, help="<name>.manifest.json")
    evaluate.add_argument("--rate", type=int, default=None, help="default: trained")
    evaluate.add_argument("--seed", type=int, default=1000, help="default 1000")
    evaluate.add_argument("--seeds", type=int, default=4, help="default 4")
    evaluate.add_argument("--data", type=Path, default=None, help="CTU-13 folder")
    evaluate.add_argument(
        "--json", type=Path, default=None, help="also write the metrics to this file"
    )
    evaluate.set_defaults(func=run_evaluate)


def run_train(args: argparse.Namespace) -> int:
    """``models train``: see the parser description."""
    from cloud.training.autoencoder import (  # noqa: PLC0415 - needs TF
        TensorFlowMissingError,
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
        paths = run_training(cfg)
        if args.nan_fixture is not None and paths:
            from cloud.training.export import write_nan_fixture  # noqa: PLC0415

            write_nan_fixture(args.nan_fixture, paths[0])
    except TensorFlowMissingError as exc:
        print(f"error: {exc}")
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
    from cloud.training.evaluate import evaluate_manifest  # noqa: PLC0415
    from cloud.training.train import json_safe  # noqa: PLC0415

    result = evaluate_manifest(
        args.manifest,
        rate=args.rate,
        seed=args.seed,
        n_seeds=args.seeds,
        dataset_dir=args.data,
    )
    text = json.dumps(json_safe(result), indent=2, allow_nan=False)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0

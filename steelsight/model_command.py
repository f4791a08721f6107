"""``steelsight model``: the registry from the command line (push, list, promote, rollback, shadow, status)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

EXIT_REFUSED = 2  # the registry refused the request (unknown model, nothing to roll back to, ...)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "model", help="the model registry: push, list, promote, roll back, shadow",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Checkpoints live in the object store under models/<sha256>.safetensors with a card of their "
                    "figures; which one the line serves is a pointer in Redis. Workers follow the pointer: they "
                    "load a new model in the background, smoke-check it on the bundled sample frames and switch "
                    "between two batches, so no frame is lost or read twice; a model that fails to load or the "
                    "smoke check is refused and the worker keeps its own. Every change is logged with who made "
                    "it (STEELSIGHT_OPERATOR, else $USER).",
        epilog="examples:\n"
               "  steelsight model push runs/ft/model.safetensors\n"
               "  steelsight model promote 3f2a9c1e      # a unique sha256 prefix of 8+ digits will do\n"
               "  steelsight model shadow 3f2a9c1e --share 0.1\n"
               "  steelsight model status\n"
               "  steelsight model rollback")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    push = actions.add_parser("push", help="store a checkpoint and its card in the registry")
    push.add_argument("file", help="a .safetensors checkpoint (refused unless it loads)")
    push.add_argument("--promote", action="store_true", help="make it the live model too")
    actions.add_parser("list", help="the registered models, newest first (* live, s shadow)")
    promote = actions.add_parser("promote", help="make a registered model the live one on every worker")
    promote.add_argument("sha", help="its sha256 or a unique prefix (8+ hex digits)")
    actions.add_parser("rollback", help="go back to the model live before the current one")
    shadow = actions.add_parser("shadow", help="have workers also score a share of frames with a challenger "
                                               "(its verdicts are compared, never published)")
    shadow.add_argument("sha", nargs="?", help="the challenger's sha256 or prefix; omit with --off")
    shadow.add_argument("--share", type=float, default=0.1, help="share of live frames it scores (default 0.1)")
    shadow.add_argument("--off", action="store_true", help="stop shadowing")
    status = actions.add_parser("status", help="the live and shadow models, each worker's model, the audit log "
                                               "and the shadow agreement")
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.add_argument("--audit", type=int, default=10, help="audit lines shown (default 10)")
    p.set_defaults(func=cmd_model)


def _registry():
    from steelsight.clients import ObjectStore, redis_client
    from steelsight.contract import get_settings
    from steelsight.registry import ModelRegistry

    settings = get_settings()
    store = ObjectStore(settings)
    store.ensure_buckets()
    return ModelRegistry(settings, store, redis_client(settings))


def _age(when: datetime) -> str:
    seconds = (datetime.now(UTC) - when).total_seconds()
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago" if seconds < 7200 else \
        when.strftime("%Y-%m-%d %H:%M")


def cmd_model(args) -> int:
    from steelsight.registry import RegistryError, operator_name

    registry = _registry()
    by = operator_name()
    try:
        if args.action == "push":
            card = registry.push(args.file, by)
            print(f"stored models/{card.sha256}.safetensors ({card.size / 1e6:.1f} MB, {card.name})")
            if args.promote:
                registry.promote(card.sha256, by)
                print(f"live: {card.sha256}")
        elif args.action == "list":
            live, shadow = registry.live(), registry.shadowing()
            cards = registry.list()
            if not cards:
                print("no models registered (steelsight model push FILE)")
            for card in cards:
                mark = "*" if card.sha256 == live else "s" if shadow and card.sha256 == shadow[0] else " "
                figures = " ".join(f"{k} {v:.4g}" for k, v in sorted(card.metrics.items())[:4])
                print(f"{mark} {card.sha256[:16]}  {card.pushed_at:%Y-%m-%d %H:%M}  {card.pushed_by:12} "
                      f"{card.name:32} {figures}")
        elif args.action == "promote":
            sha = registry.resolve(args.sha)
            previous = registry.promote(sha, by)
            print(f"live: {sha} (was {previous or 'the workers’ configured checkpoint'}); workers switch within "
                  f"{registry.settings.model_poll_s:g} s plus a load")
        elif args.action == "rollback":
            print(f"live: {registry.rollback(by)}")
        elif args.action == "shadow":
            if args.off:
                registry.shadow_off(by)
                print("shadow off")
            elif not args.sha:
                print("name the challenger (SHA) or pass --off", file=sys.stderr)
                return EXIT_REFUSED
            else:
                sha = registry.resolve(args.sha)
                registry.shadow(sha, args.share, by)
                print(f"shadow: {sha} on {args.share:.0%} of frames")
        elif args.action == "status":
            data = registry.status()
            if args.json:
                print(json.dumps(data, indent=1, default=str))
            else:
                _print_status(data, args.audit)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


def _print_status(data: dict, audit: int) -> None:
    print(f"live:    {data['live'] or 'none set: workers serve their configured checkpoint'}")
    shadow = data["shadow"]
    if shadow:
        frames = sum(v["frames"] for v in shadow["agreement"].values())
        agree = sum(v["agree"] for v in shadow["agreement"].values())
        rate = f"{agree / frames:.1%}" if frames else "n/a"
        print(f"shadow:  {shadow['sha256']} on {shadow['share']:.0%} of frames, agreement {rate} over {frames} "
              "frames")
        for verdict, v in sorted(shadow["agreement"].items()):
            print(f"         {verdict:16} {v['agree']}/{v['frames']}")
    print("workers:")
    for w in data["workers"]:
        refused = f"  REFUSED {w['refused_sha256'][:12]}: {w['refused_reason']}" if w.get("refused_sha256") else ""
        print(f"  {w['worker']:40} {w['sha256'][:12]}  seen {_age(datetime.fromisoformat(w['at']))}{refused}")
    print("audit:")
    for e in data["audit"][:audit]:
        what = e["sha256"][:12] if e.get("sha256") else ""
        print(f"  {e['at'][:19]}  {e['by']:12} {e['action']:10} {what}")

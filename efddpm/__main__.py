"""The `efddpm` command and `python -m efddpm`: the app's subcommands (efddpm.app.cli) and `eval`
(efddpm.eval.command), which lives a layer above the app and is handed to it here."""
import sys


def main(argv: list[str] | None = None) -> int:
    from efddpm.app.cli import main as app_main
    from efddpm.eval.command import add_parser, evaluate
    return app_main(argv, {"eval": (add_parser, evaluate)})


if __name__ == "__main__":
    sys.exit(main())

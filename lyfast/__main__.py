"""`python -m lyfast <command>`: command-line tools. Commands import their code only when chosen."""
import sys

COMMANDS = {"profile-memory": "activation memory of lyfast vs lycoris adapters on SDXL / DiT layers (--model)",
            "plan": "will a training step fit, and how fast: peak memory of a whole model's step (--model, --settings)"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"python -m lyfast: unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        print("usage: python -m lyfast <command> [options]\n\ncommands:")
        for name, help_ in COMMANDS.items():
            print(f"  {name:16s} {help_}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "profile-memory":
        from ._checkout import prefer_installed_kernels

        prefer_installed_kernels()  # diffusers imports transformers, which imports the PyPI `kernels`
        from .profile import profile_memory

        profile_memory(argv[1:])
    elif argv[0] == "plan":
        from ._checkout import prefer_installed_kernels

        prefer_installed_kernels()
        from .plan import main as plan_main

        plan_main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Entry point of `mailkube-gateway`: the SMTP gateway (MX, submission, implicit TLS).

A placeholder until issue #3 builds it: it says what it will be and exits 0, which
`mailkube dev` reads as "this component has nothing to run yet".
"""

import sys

WHAT = "the SMTP gateway (MX, submission, implicit TLS)"


def main() -> None:
    print(f"mailkube-gateway: {WHAT}; not built yet (issue #3)", file=sys.stderr)


if __name__ == "__main__":
    main()

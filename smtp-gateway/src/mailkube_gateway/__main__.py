"""Entry point of `mailkube-gateway`: the SMTP gateway (MX 25, submission 587, implicit TLS 465).

A placeholder until issue #3 builds it: it says what it will be and exits 0, which
`mailkube dev` reads as "this component has nothing to run yet".
"""

import sys


def main() -> None:
    print("mailkube-gateway: the SMTP gateway (MX 25, submission 587, implicit TLS 465); not built yet (issue #3)", file=sys.stderr)


if __name__ == "__main__":
    main()

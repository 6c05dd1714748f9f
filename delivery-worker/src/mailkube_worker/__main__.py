"""Entry point of `mailkube-worker`: the delivery worker (maildirs, remote SMTP, bounces).

A placeholder until issue #5 builds it: it says what it will be and exits 0, which
`mailkube dev` reads as "this component has nothing to run yet".
"""

import sys

WHAT = "the delivery worker (maildirs, remote SMTP, bounces)"


def main() -> None:
    print(f"mailkube-worker: {WHAT}; not built yet (issue #5)", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Entry point of `mailkube-worker`: the delivery worker (maildir and remote SMTP delivery, retries, bounces).

A placeholder until issue #5 builds it: it says what it will be and exits 0, which
`mailkube dev` reads as "this component has nothing to run yet".
"""

import sys


def main() -> None:
    print("mailkube-worker: the delivery worker (maildir and remote SMTP delivery, retries, bounces); not built yet (issue #5)", file=sys.stderr)


if __name__ == "__main__":
    main()

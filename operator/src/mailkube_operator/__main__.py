"""Entry point of `mailkube-operator`: the Kubernetes operator (MailDomain and MailUser into the routing table).

A placeholder until issue #6 builds it: it says what it will be and exits 0, which
`mailkube dev` reads as "this component has nothing to run yet".
"""

import sys


def main() -> None:
    print("mailkube-operator: the Kubernetes operator (MailDomain and MailUser into the routing table); not built yet (issue #6)", file=sys.stderr)


if __name__ == "__main__":
    main()

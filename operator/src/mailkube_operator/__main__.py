"""Entry point of `mailkube-operator`: the Kubernetes operator (custom resources to routing).

A placeholder until issue #6 builds it: it says what it will be and exits 0, which
`mailkube dev` reads as "this component has nothing to run yet".
"""

import sys

WHAT = "the Kubernetes operator (custom resources to routing)"


def main() -> None:
    print(f"mailkube-operator: {WHAT}; not built yet (issue #6)", file=sys.stderr)


if __name__ == "__main__":
    main()

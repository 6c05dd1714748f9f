#!/usr/bin/env bash
# Builds kube-apiserver and kube-controller-manager 1.20.2 from Debian bookworm's `kubernetes`
# source package with Debian's Go 1.19, both fetched into a private directory (the system's apt
# sources and packages are not touched). Cached outside the checkout, keyed by the package
# version: a second run only checks that the binaries are there.
# See docs/operator.md ("Tests against a real API server") for why this is not a download.
set -euo pipefail

KUBE_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
KUBE_VERSION="v1.20.2"
CACHE_ROOT="${MAILKUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mailkube}"
OUT="$CACHE_ROOT/kubernetes-$KUBE_DEB_VERSION"
BIN="$OUT/bin"

if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; then
	echo "$BIN"
	exit 0
fi

WORK="$OUT/work"
rm -rf "$WORK"
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/archives/partial" "$WORK/debs" "$WORK/go-root" "$BIN"
cat >"$WORK/apt/sources.list" <<SOURCES
deb http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb-src http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
deb-src http://deb.debian.org/debian-security bookworm-security main
SOURCES
APT_OPTS=(
	-o "Dir::Etc::SourceList=$WORK/apt/sources.list"
	-o "Dir::Etc::SourceParts=/nonexistent"
	-o "Dir::State::Lists=$WORK/apt/lists"
	-o "Dir::Cache::Archives=$WORK/apt/archives"
	-o "Dir::Cache::pkgcache="
	-o "Dir::Cache::srcpkgcache="
	-o "APT::Sandbox::User=root"
)
echo "build-kube-apiserver: fetching sources and Go 1.19 into $WORK" >&2
apt-get "${APT_OPTS[@]}" -qq update
(cd "$WORK" && apt-get "${APT_OPTS[@]}" -qq source --download-only "kubernetes=$KUBE_DEB_VERSION")
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" -qq download golang-1.19-go golang-1.19-src golang-github-modern-go-reflect2-dev)
for deb in "$WORK"/debs/*.deb; do dpkg -x "$deb" "$WORK/go-root"; done
(cd "$WORK" && dpkg-source -x --no-check kubernetes_*.dsc src >/dev/null)

GOROOT_DIR="$WORK/go-root/usr/lib/go-1.19"
SRC="$WORK/src"
# The vendored reflect2 1.0.1 crashes the apiserver under Go >= 1.18 (fatal error: fault in
# mapiterinit on the first custom-resource create); Debian's 1.0.2 does not.
REFLECT2="$(find "$WORK/go-root/usr/share/gocode/src/github.com/modern-go/reflect2" -maxdepth 0)"
rm -rf "$SRC/vendor/github.com/modern-go/reflect2"
cp -r "$REFLECT2" "$SRC/vendor/github.com/modern-go/reflect2"
rm -f "$SRC/vendor/github.com/modern-go/reflect2/go.mod" "$SRC/vendor/github.com/modern-go/reflect2/go.sum"

echo "build-kube-apiserver: building (about 5 minutes on 2 cores)" >&2
(
	cd "$SRC"
	export GOROOT="$GOROOT_DIR" PATH="$GOROOT_DIR/bin:$PATH" GOPROXY=off GOFLAGS=-mod=vendor \
		GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath" CGO_ENABLED=0 \
		KUBE_GIT_VERSION="$KUBE_VERSION" KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean
	make WHAT="cmd/kube-apiserver cmd/kube-controller-manager"
)
for name in kube-apiserver kube-controller-manager; do
	install -m 0755 "$SRC/_output/local/bin/linux/amd64/$name" "$BIN/$name.tmp"
	mv "$BIN/$name.tmp" "$BIN/$name"
done
"$BIN/kube-apiserver" --version >&2
rm -rf "$WORK"
echo "$BIN"

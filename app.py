"""MediScan entry point.

    streamlit run app.py                  the dashboard (model: $MEDISCAN_MODEL, else models/best.safetensors)
    python app.py flask [--port 5000]     the HTTP API (see mediscan/serve.py)
    python app.py dicom --out DIR         a DICOM node: receive studies, store results (mediscan/apps/dicom_node.py)

This file only dispatches: the dashboard lives in mediscan/dashboard.py, the API in mediscan/serve.py.
"""
import sys

USAGE = (__doc__ or "streamlit run app.py | python app.py flask [--port 5000]").strip()


def _run_by_streamlit() -> bool:
    """True when Streamlit executes this file (``streamlit run`` or its AppTest).

    ``__name__ == "__main__"`` does not tell: Streamlit runs the script as ``__main__`` too. A plain
    ``python app.py`` never imported streamlit, so the API path does not pay for importing it.
    """
    if "streamlit" not in sys.modules:
        return False
    from streamlit.runtime.scriptrunner import get_script_run_ctx
    return get_script_run_ctx(suppress_warning=True) is not None


def main(argv: list[str]) -> int:
    """``python app.py flask ...`` starts the API, ``python app.py dicom ...`` the DICOM node; anything else
    prints how to start them."""
    if argv[:1] == ["flask"]:
        from mediscan.apps.serve import main as serve_main
        return serve_main(argv[1:])
    if argv[:1] == ["dicom"]:
        from mediscan.apps.dicom_node import main as dicom_main
        return dicom_main(argv[1:])
    print(USAGE, file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if _run_by_streamlit():
    from mediscan.apps.dashboard import render
    render()
elif __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

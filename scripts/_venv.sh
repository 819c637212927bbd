# Sourced by the scripts: make sure .venv exists and holds chatzeo with every extra.
# Set CHATZEO_VENV to use another environment.
VENV="${CHATZEO_VENV:-.venv}"
if [ ! -x "$VENV/bin/chatzeo" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -e ".[test,bench,pg,web]"
    # An editable install is an import hook that runs after the path search, so a
    # folder named chatzeo/ in the current directory (a clone) shadowed it; a path
    # entry for the repository makes the path search find the real package first.
    "$VENV/bin/python" -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"] + "/chatzeo-repo.pth", "w").write(sys.argv[1] + "\n")' "$PWD"
    touch "$VENV/.installed"
fi

# Sourced by the scripts: make sure .venv exists and holds chatzeo with every extra.
# Set CHATZEO_VENV to use another environment.
VENV="${CHATZEO_VENV:-.venv}"
if [ ! -x "$VENV/bin/chatzeo" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -e ".[test,bench,pg,web]"
    touch "$VENV/.installed"
fi

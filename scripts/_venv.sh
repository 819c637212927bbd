# Sourced by the scripts: make sure .venv exists and holds chatzeo with every extra.
# Set CHATZEO_VENV to use another environment.
VENV="${CHATZEO_VENV:-.venv}"
if [ ! -x "$VENV/bin/chatzeo" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    # editable_mode=compat: a path entry instead of an import hook, so a folder
    # named chatzeo/ in the current directory (a clone) cannot shadow the install.
    "$VENV/bin/pip" install --quiet -e ".[test,bench,pg]" --config-settings editable_mode=compat
    touch "$VENV/.installed"
fi

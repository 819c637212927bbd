"""The terminal wing: ``chatzeo chat``, a full-screen client in the user's terminal.

- `app`: the screen (prompt_toolkit, UI thread): scrollback, input line, status bar,
  key bindings, resizing; `run_chat` is the entry point the CLI calls.
- `worker`: the database thread (`ClientWorker`): push, the outbox while the server
  is away, heartbeat, read markers, presence lines.
- `events`: the requests the UI sends the worker and the events it sends back.
- `commands`: slash commands, parsed and checked before anything is sent.
- `display`: how messages, notices, the prompt and the status bar are drawn.
- `sanitize`: the one place untrusted text is made safe for a terminal.
- `editing`: cursor movement and deletion by grapheme (emoji sequences).
- `completion`: Tab completion of commands, rooms and names.

Imports run downward only: these modules use the core (``chatzeo/*.py``), never
``chatzeo.server`` or ``chatzeo.cli``, and the core never imports them.
"""

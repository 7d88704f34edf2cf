"""The protocol between dgserve's processes: the leaf every other package imports, importing none of them.

    contract.py   every Redis key, field, payload, request status (and its transitions) and Lua script; client
                  settings for Redis; sampling defaults from a checkpoint's generation config; usage
    api.py        the gateway's public API: request bodies, answers, WebSocket messages (the client reads them too)
    sudoku.py     the rules of a Sudoku (normalising, checking, reading a grid out of a canvas)
    environment.py  every DG_* variable a process reads: the settings classes refuse any other
    logs.py       one logging setup for every process

Layers, each importing only those before it: protocol -> service (the gateway, no torch) and worker (the engine) ->
training (checkpoints, evaluation) -> dgserve (the entry layer: CLI, `up`, terminal, client).
"""

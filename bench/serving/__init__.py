"""The serving benchmark's parts (`bench/serve.py` runs them):

    workload.py   the requests (prompts of exact token lengths, seeds), the record of one request, the checkpoint
    clients.py    WebSocket clients that send them and time every event
    procstat.py   CPU seconds of processes and threads, Prometheus samples
    service.py    the service mode: Redis + gateway + a worker, real processes (or a running service)
    engine.py     the engine mode: the same requests into the engine in this process (optionally with the
                  worker's publisher beside it, through its public API)
    report.py     summaries, ratios, where the time goes, JSON, the plot, the printout
"""

"The benchmark behind `hardmine-bench`: data, models, tasks, comparisons, runs, report and the command line (`main`)."

def __getattr__(name:str):
    # `main` (the command line) is imported when asked for, so that importing one of the benchmark's modules (the pure
    # `bench.compare`, say) does not import all of them
    if name == 'main':
        from .cli import main
        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

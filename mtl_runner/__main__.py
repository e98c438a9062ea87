from mtl_runner.cli import run

run()

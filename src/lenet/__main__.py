from lenet.cli import run

run()

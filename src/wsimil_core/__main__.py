from wsimil_core.cli import main

main()

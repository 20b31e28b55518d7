from medtune.cli.app import main

main()

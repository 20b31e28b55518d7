from medtune.cli import main

main()

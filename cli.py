from compresslight.cli import main

main()

from reloader.app import main

main()

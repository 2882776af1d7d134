from unlearnlm.cli import main

main()

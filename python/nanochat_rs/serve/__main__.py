from nanochat_rs.serve.cli import main

main()

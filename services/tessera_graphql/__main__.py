"""`python -m tessera_graphql`: serves the GraphQL API on TESSERA_GRAPHQL_PORT (8090)."""

import sys

from tessera_graphql.app import main

sys.exit(main())
